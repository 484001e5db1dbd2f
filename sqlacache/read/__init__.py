"""The read path: ``do_orm_execute`` → policy → key → lookup → fill → decode → ORM objects."""
