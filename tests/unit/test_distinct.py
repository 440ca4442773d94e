"""`distinct`: a template repeated across questions is caught; the same question asked twice may get the same
reply."""

from doppel.train.likeness import distinct

TEMPLATE = "Thank you for raising this. I will look into it and get back to you by Friday."


def test_a_template_given_to_different_questions_is_not_distinct():
    replies = [TEMPLATE, TEMPLATE + "!", "we should roll back the deploy first, then look at the logs"]
    contexts = ["Sam: can we ship friday?", "Jo: who owns the billing runbook?", "Ana: the deploy failed"]
    assert distinct(replies, contexts) == round(1 / 3, 4)
    assert distinct(replies) == round(1 / 3, 4)


def test_the_same_question_asked_twice_may_get_the_same_reply():
    replies = [TEMPLATE, TEMPLATE, "we should roll back the deploy first, then look at the logs"]
    contexts = ["Sam: @Margaret can we ship friday?", "Sam: all: can we ship friday?", "Ana: deploy failed"]
    assert distinct(replies, contexts) == 1.0
    assert distinct(replies) == round(1 / 3, 4)  # without the contexts, as before


def test_nothing_to_measure():
    assert distinct([]) is None
