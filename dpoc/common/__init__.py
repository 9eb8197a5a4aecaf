"""Small helpers every layer uses (atomic publishing, a free port); they import only `dpoc.contract`."""
