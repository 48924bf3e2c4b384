"""Instruction templates of the tuning tasks (LC-Rec / TTDS style).

Placeholders: {user} (rendered "user <ua_..>..." or "the user" without a user index), {item} (an item
ID), {title}, {description}. Sequential-recommendation templates END with the history, so that one
causal forward pass over "template + item_1 ... item_n" predicts every next item (whole-sequence
training) and an evaluation prompt "template + history" is followed directly by the answer.
`tasks.prompt` picks the sequential-recommendation set: `instruction` (SEQREC, the default) or `ids` (SEQREC_IDS).
"""
from __future__ import annotations

SEQREC = [
    "You are an expert in sequential recommendation. Please predict the most suitable next item for {user}, based on the historical interactions: ",
    "Here is the purchase history of {user}, in chronological order. Recommend the next item: ",
    "Given the items {user} interacted with so far, predict the item they will buy next. History: ",
    "{user} has bought the following items, oldest first. What will be bought next? ",
    "Based on the sequence of past purchases of {user}, generate the ID of the next item: ",
    "Sequential recommendation for {user}. Previously purchased items: ",
]
# `tasks.prompt: ids` (TIGER's input: no words, only the user's ID, if any, and the items' IDs)
SEQREC_IDS = ["{user}"]
PROMPTS = {"instruction": SEQREC, "ids": SEQREC_IDS}
ITEM2INDEX = [  # text -> item ID (LC-Rec index2item direction: the answer is the ID)
    'Which item has the title "{title}"? Answer with its ID: ',
    'An item is described as: "{description}". What is its ID? ',
    'Find the ID of the item titled "{title}": ',
]
INDEX2ITEM = [  # item ID -> text (the answer is words)
    "What is the title of item {item}? ",
    "Give the name of the item {item}: ",
    "Item {item} is called: ",
]
USERPRED = [  # item + the users who bought it so far -> the next user
    "Item {item} was bought by these users, in order. Predict the next buyer: ",
    "The following users purchased {item}. Who is the next user to buy it? ",
]
REVIEW = [  # history -> the user's review of the last item
    "{user} bought these items: {history}. Write the review of the last item: ",
    "Purchase history of {user}: {history}. Their review of the most recent purchase: ",
]
