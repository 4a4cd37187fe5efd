"""DSPA-style steering (SPEC section 6): a conditional-difference map from preference triples (``conditional_map``,
built by ``build`` on the SAEs ``saes`` provides, stored by ``store``, audited by ``audit``), prompt-conditional SAE
edits while decoding (``vector``, ``edit``, ``hook``, ``generate``) and while scoring (``likelihood``), and its
measurement (``layers``: the layers; ``evaluate`` / ``eval_report`` / ``flops``: against unsteered, a static
baseline and DPO). Only the DSPA abstract is public; this is a reconstruction, named "DSPA-style"."""
