"""The method framework. Today: the one training engine (``threecad.methods.training``) every
gradient-trained method runs on; the Method protocol, registry and runners move here next."""
