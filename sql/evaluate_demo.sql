-- Held-out retrieval of the bundled demo model, against the random initialization it was
-- trained from (chance recall@5 is 5 / the number of test pairs).
.load ./dist/archaeclip
.headers on
.mode box
INSERT INTO temp.clip_models(name, path) VALUES ('archaeclip-demo', 'models/archaeclip-demo');
SELECT 'archaeclip-demo' AS model, direction, pairs, round(recall_at_1, 3) AS "R@1",
       round(recall_at_5, 3) AS "R@5", round(recall_at_10, 3) AS "R@10", median_rank,
       round(5.0 / pairs, 4) AS "chance R@5"
FROM clip_evaluate('archaeclip-demo', 'SELECT image, caption FROM captions WHERE split = ''test''');
