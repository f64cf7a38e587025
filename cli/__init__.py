"""The `tcache` command line: thin click commands over the teachercache and student libraries."""
