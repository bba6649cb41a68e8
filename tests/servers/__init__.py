"""Out-of-process test servers (started as real processes on loopback ports) shared by test modules."""
