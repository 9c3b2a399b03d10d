"""The main job on the embedded default: `blip3 demo`, from images to a trained tiny model."""
