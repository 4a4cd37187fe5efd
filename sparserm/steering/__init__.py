"""DSPA-style steering (SPEC section 6): a conditional-difference map from preference triples (``conditional_map``,
built by ``build``, stored by ``store``) and prompt-conditional SAE edits while decoding (``vector``, ``edit``,
``hook``, ``generate``). Only the DSPA abstract is public; this is a reconstruction, named "DSPA-style"."""
