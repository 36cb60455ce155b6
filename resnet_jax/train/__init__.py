"""Training: the config, optimizer, state and pure steps; the run builder (`run`), the cadence shared by the loop and the linear probe, MFU and metrics."""
