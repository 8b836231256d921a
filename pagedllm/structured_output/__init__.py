"""Structured outputs: JSON schema, regex, choice and EBNF grammar constraints via xgrammar.

    grammar.py  a request's constraint -> cache key -> parsed grammar (errors as ValueError)
    manager.py  compiles off the step loop and caches by key; one matcher per sequence; starts
                each step's bitmask fill; advances the matchers after sampling
    bitmask.py  the bitmask layout; GrammarBitmask, which rides in the SchedulerOutput to the
                worker and masks the logits in one call
    step.py     the manager's calls placed at the engine core's step hooks (engine/features.py)

xgrammar is imported on first use, so engines that never see a constrained request never
load it. See docs/structured_outputs.md.
"""
