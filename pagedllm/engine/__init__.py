"""Request intake and output delivery around the scheduler and the model runner."""
