"""tcache's teacher cache: format (schema, manifest, codecs), writer, reader, build loop, plan, stats, verify."""
