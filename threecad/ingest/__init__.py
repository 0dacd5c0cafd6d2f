"""Getting data in: annotations, tiling and preprocessing of raw frames, folder import, download, Hugging Face export."""
