"""Showing results: terminal tables (tables), the HTML report (html) with its SVG drawings (svg), and matplotlib plots (plots)."""
