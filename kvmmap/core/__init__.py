"""The core of a cache: the file format and the state it holds, below the PagedKVCache facade.

Modules, bottom up: ``fileio`` (file primitives), ``layout`` (where arrays sit in a page),
``superblock`` (the header and geometry limits), ``metaslot`` (the two commit slots),
``arena`` (page bytes, checksums), ``tail`` (open pages), ``sequences`` (sequences, block
tables, copy-on-write, appends), ``payload`` (a commit's bytes). See docs/ARCHITECTURE.md.
"""
