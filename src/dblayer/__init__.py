"""The async PostgreSQL database layer taught by the tested guide."""
