"""Engine: a model on a device. `Model` (the C core behind one object), memory
plans and the batch packer (plan). May import checkpoints/ and the core."""
