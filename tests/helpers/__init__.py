"""Models, inputs and checks shared by the tests (not tests themselves)."""
