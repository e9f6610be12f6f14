"""Networks building blocks (see DESIGN.md §1)."""
