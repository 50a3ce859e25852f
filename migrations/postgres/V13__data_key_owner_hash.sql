-- A connection's data keys are looked up by their owner (the stream id) only to list or destroy
-- the live ones, always by equality. A hash index keeps a 4-byte hash per key where the B-tree
-- kept the whole 48-character stream id: about 60 bytes per connection instead of 92 at 20,000
-- connections, and a destroyed key leaves the index (nothing asks for those by owner).
--
-- Hash indexes are crash-safe and replicated since PostgreSQL 10. Building it reads the table
-- once; the old index goes in the same transaction.

CREATE INDEX data_keys_owner_live ON data_keys USING hash (owner) WHERE wrapped IS NOT NULL;
DROP INDEX data_keys_owner;
