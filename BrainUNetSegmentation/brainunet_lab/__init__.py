"""The lab: what makes and judges BrainUNet models (data engine, training, fine-tuning, cross-validation,
calibration, evaluation, montage). It imports the runtime (``brainunet``); the runtime never imports it,
and the Slicer extension does not install it."""
