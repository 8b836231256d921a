"""Structured outputs: JSON schema, regex, choice and EBNF grammar constraints via xgrammar.

    grammar.py  a request's constraint -> cache key -> parsed grammar (errors as ValueError)
    manager.py  compiles off the step loop and caches by key; one matcher per sequence; the
                runner's hook that masks a step's logits; advancing matchers after sampling
    bitmask.py  the bitmask layout and its one-call application to the logits

xgrammar is imported on first use, so engines that never see a constrained request never
load it. See docs/structured_outputs.md.
"""
