"""Pod plans: the sharded train step compiled from abstract inputs, CPU estimates, deviceless TPU / GPU compiles, the chip table."""
