"""inferq producers package."""
