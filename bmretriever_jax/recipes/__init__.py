"""Whole jobs built from the layers below: the quickstarts."""
