"""Infrastructure every stage shares: shard I/O, the DuckDB catalog, keys, logging, errors."""
