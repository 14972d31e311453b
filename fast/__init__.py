"""The optimized implementation of pagedkv: block manager, engine, models, API and CLI."""
