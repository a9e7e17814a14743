"""PathoSCOPE: the method (torch_model.PathoScopeModel, lightning_model.PathoScope and the maths
they use); pathoscope.app is the application built on it (docs/design.md)."""
