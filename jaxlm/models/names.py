"""Names of parameters that code outside the models selects by (lora.train_also=[embed]):
the embedding tables the models create (tokens, learned positions, BERT's token types) and
an untied output head's module."""

TOKEN_TABLE = "embedding"
POSITION_TABLE = "pos_embed"
TYPE_TABLE = "type_embed"
OUTPUT_HEAD = "lm_head"
