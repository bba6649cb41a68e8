"""``make reliability``: a fault harness proving, by event id, that nothing is lost and nothing duplicated.

Each fault (``reliability.faults``) runs the real pipeline entry points (``healthflow run normalize`` in a process of
its own, ``healthflow serve``) against real components on loopback, injects the fault, lets it recover and balances
the books per destination: events in = delivered + dead-lettered, lost = the rest (``reliability.books``).
"""
