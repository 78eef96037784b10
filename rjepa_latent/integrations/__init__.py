"""Integrations: thin adapters for other libraries (torch datasets, Ray Data's
StepLatents) over store/ and run/. May import every stage below it (run/ and
down); nothing in the package imports them but the public modules."""
