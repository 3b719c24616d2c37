"""Showing results: terminal tables now; HTML, drawings and plots later."""
