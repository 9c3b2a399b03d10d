"""`blip3 eval`: benchmark protocols (prompt, answer normalisation, metric) run on a model
directory, with results recorded in the catalog beside the runs and mixtures that made the model."""
