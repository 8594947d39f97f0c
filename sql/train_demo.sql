-- Trains the bundled demo model, models/archaeclip-demo, with clip_train itself: a small CLIP
-- (models/demo-base/config.json: ViT 64 px, patch 8, 4 layers; text 4 layers; 64-dim space)
-- from random weights on the training split of the demo collection. Reproduce it with
--   make train-demo
-- (it runs: python3 examples/demo_collection.py dist/demo.db, then this script in the sqlite3
-- shell on dist/demo.db). The log and options land in models/archaeclip-demo/archaeclip_training.json;
-- the evaluation below is saved as models/archaeclip-demo/evaluation.txt by the Makefile.
.load ./dist/archaeclip
.bail on
INSERT INTO temp.clip_models(name, path) VALUES ('demo-base', 'models/demo-base');
.headers on
.mode box
SELECT epoch, step, round(loss, 4) AS loss, CASE WHEN lr IS NOT NULL THEN printf('%.2e', lr) END AS lr, round(logit_scale, 2) AS scale,
       round(examples_per_s, 1) AS "pairs/s", round(elapsed_s) AS seconds,
       CASE kind WHEN 'eval' THEN json_extract(detail, '$.text_to_image.recall_at_5') END AS "t2i R@5"
FROM clip_train('demo-base',
  'SELECT image, caption FROM captions WHERE split = ''train''',
  json_object('output', 'models/archaeclip-demo', 'init', 'random', 'seed', 42,
              'epochs', 24, 'batch_size', 64, 'lr', 1e-3, 'warmup_steps', 40,
              'weight_decay', 0.2, 'save_optimizer', 0, 'overwrite', 1,
              'validation', 'SELECT image, caption FROM captions WHERE split = ''test''',
              'eval_every', 0))
WHERE kind IN ('eval', 'checkpoint') OR step % 20 = 0;
