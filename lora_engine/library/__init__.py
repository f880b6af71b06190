"""The LoRA library: the files in the LoRA folders and what is known about each.

- :mod:`.index`: the folders' index and the one name resolver (stem, sub-folder, alias, short hash);
- :mod:`.sidecar`: the on-disk JSON cache of hashes, metadata and summaries;
- :mod:`.parsed`: the in-memory LRU of parsed files (real path, size, mtime);
- :mod:`.hashes`: the file hashes A1111, Civitai and kohya use;
- :mod:`.summary`: the one-screen diagnosis of a file (format, types, architecture, problems).
"""
