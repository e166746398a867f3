"""inferq workers package."""
