"""The ground floor: the content-addressed cache, file paths and checksums, the errors. It imports nothing else of
marker_lab, so every layer above may use it."""
