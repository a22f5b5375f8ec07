"""`squad-ds tune`: the search (search), one trial process (trial), the report (report)."""
