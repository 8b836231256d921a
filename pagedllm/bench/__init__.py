"""`pagedllm bench ...`: measurements against a baseline run in the same process."""
