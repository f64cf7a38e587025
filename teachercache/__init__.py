"""tcache's teacher cache: format (schema), writer, reader, build loop and stats."""

__version__ = "0.1.0"
