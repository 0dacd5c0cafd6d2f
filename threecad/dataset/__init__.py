"""A dataset in the 3CAD layout: layout, loaders, transforms, masks, manifest, split, verify, stats, catalog."""
