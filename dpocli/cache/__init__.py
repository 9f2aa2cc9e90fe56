"""The reference cache on disk, the boundary between the stages: manifest, shards, folder. No torch."""
