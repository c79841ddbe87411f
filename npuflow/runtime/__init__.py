"""Models on devices: the loader, the engine (the one generation loop), backends, parallel, offline."""
