"""Small I/O and system utilities: errors, paths, atomic writes, vector files, tree paths, precision, machine facts, the allocator, tables."""
