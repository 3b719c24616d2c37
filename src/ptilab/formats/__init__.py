"""Text and data formats ptilab reads and writes: Linux ptdump, QEMU's monitor
`info mem`/`info tlb`, JSON, System.map/kallsyms.

Each writer prints byte for byte what the original tool prints for the same
tables, so its output can be diffed against the real thing; each reader
raises ptilab.errors.InputError naming the line it could not read."""
