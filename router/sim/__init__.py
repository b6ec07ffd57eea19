"""The simulator: the real engine on virtual time, and the Erlang formulas it is checked against.

Pure like the engine: virtual time is an argument and every random draw comes from a generator
seeded from the scenario, so a seed gives the same report byte for byte.
"""
