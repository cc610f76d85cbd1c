-- Indicators per ticker, in date order, from the table `bars` (schema ohlcv).
-- Output: schema `indicators` (schemas/indicators.yaml documents every column and its
-- warm-up). Run by stages/market/src/indicators/engine.rs on groups of whole tickers.
--
-- Recursive indicators are the user-defined window functions ta_ema, ta_macd_line, ta_rsi
-- and ta_atr (TA-Lib's seeding; see src/indicators/talib.rs). Everything else is a plain
-- window function. Every window is PARTITION BY ticker ORDER BY date and looks only at the
-- current and earlier rows, so nothing here can see the future.
-- Warm-up rows are NULL: a windowed value is kept only once its window is full (rn = row
-- number within the ticker, or a count of non-NULL values for windows over indicators).

WITH base AS (
  SELECT
    ticker, date, open, high, low, close, volume, adj_close,
    ROW_NUMBER() OVER (PARTITION BY ticker ORDER BY date) AS rn,
    AVG(close) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS avg_20,
    AVG(close) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 49 PRECEDING AND CURRENT ROW) AS avg_50,
    AVG(close) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 99 PRECEDING AND CURRENT ROW) AS avg_100,
    AVG(close) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 199 PRECEDING AND CURRENT ROW) AS avg_200,
    -- BBANDS and the z-score use the population std (TA-Lib STDDEV), not the sample one.
    STDDEV_POP(close) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS sd_20,
    -- STOCH fast %K looks at the highest high and lowest low of the last 9 rows.
    MAX(high) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 8 PRECEDING AND CURRENT ROW) AS hh_9,
    MIN(low) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 8 PRECEDING AND CURRENT ROW) AS ll_9,
    SUM((high + low + close) / 3.0 * volume) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS pv_20,
    SUM(volume) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS v_20,
    AVG(volume) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS vol_mean_20,
    STDDEV_POP(volume) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS vol_sd_20,
    LAG(close, 1) OVER (PARTITION BY ticker ORDER BY date) AS close_1,
    LAG(close, 5) OVER (PARTITION BY ticker ORDER BY date) AS close_5,
    LAG(close, 20) OVER (PARTITION BY ticker ORDER BY date) AS close_20,
    ta_ema(close, 12) OVER (PARTITION BY ticker ORDER BY date) AS ema_12,
    ta_ema(close, 26) OVER (PARTITION BY ticker ORDER BY date) AS ema_26,
    ta_rsi(close, 14) OVER (PARTITION BY ticker ORDER BY date) AS rsi_14,
    ta_atr(high, low, close, 14) OVER (PARTITION BY ticker ORDER BY date) AS atr_14,
    -- MACD(12, 26, 9): both EMAs seeded on row 26, TA-Lib's alignment.
    ta_macd_line(close, 12, 26) OVER (PARTITION BY ticker ORDER BY date) AS macd_line
  FROM bars
),

shaped AS (
  SELECT
    *,
    CASE WHEN rn >= 20 THEN avg_20 END AS sma_20,
    CASE WHEN rn >= 50 THEN avg_50 END AS sma_50,
    CASE WHEN rn >= 100 THEN avg_100 END AS sma_100,
    CASE WHEN rn >= 200 THEN avg_200 END AS sma_200,
    -- TA-Lib STOCH fast %K, written as TA-Lib computes it (0 when the 9-row range is flat).
    CASE WHEN rn >= 9 THEN
      CASE WHEN hh_9 - ll_9 <> 0.0 THEN (close - ll_9) / ((hh_9 - ll_9) / 100.0) ELSE 0.0 END
    END AS fast_k,
    close / NULLIF(close_1, 0.0) - 1.0 AS ret_1d,
    close / NULLIF(close_5, 0.0) - 1.0 AS ret_5d,
    close / NULLIF(close_20, 0.0) - 1.0 AS ret_20d
  FROM base
),

smoothed AS (
  SELECT
    *,
    -- MACD signal: EMA 9 of the line, seeded on its first 9 values.
    ta_ema(macd_line, 9) OVER (PARTITION BY ticker ORDER BY date) AS macd_signal_full,
    -- KDJ: STOCH slow %K = EMA 5 (k = 1/3) of fast %K.
    ta_ema(fast_k, 5) OVER (PARTITION BY ticker ORDER BY date) AS slow_k,
    STDDEV_SAMP(ret_1d) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS ret_sd_20,
    COUNT(ret_1d) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS ret_n_20
  FROM shaped
),

stoch AS (
  SELECT
    *,
    -- STOCH slow %D = EMA 5 of slow %K; TA-Lib outputs %K and %D from the same row.
    ta_ema(slow_k, 5) OVER (PARTITION BY ticker ORDER BY date) AS kdj_d_full
  FROM smoothed
),

main AS (
  SELECT
    ticker, date, open, high, low, close, volume, adj_close,
    sma_20, sma_50, sma_100, sma_200,
    ema_12, ema_26,
    rsi_14,
    -- TA-Lib MACD starts all three outputs where the signal starts.
    CASE WHEN macd_signal_full IS NOT NULL THEN macd_line END AS macd,
    macd_signal_full AS macd_signal,
    macd_line - macd_signal_full AS macd_hist,
    atr_14,
    CASE WHEN rn >= 20 THEN avg_20 + 2.0 * sd_20 END AS bb_upper,
    CASE WHEN rn >= 20 THEN avg_20 END AS bb_middle,
    CASE WHEN rn >= 20 THEN avg_20 - 2.0 * sd_20 END AS bb_lower,
    CASE WHEN kdj_d_full IS NOT NULL THEN slow_k END AS kdj_k,
    kdj_d_full AS kdj_d,
    3.0 * slow_k - 2.0 * kdj_d_full AS kdj_j,
    CASE WHEN rn >= 20 THEN (close - avg_20) / NULLIF(sd_20, 0.0) END AS zscore_20,
    CASE WHEN rn >= 20 THEN pv_20 / NULLIF(v_20, 0.0) END AS vwap_20,
    ret_1d, ret_5d, ret_20d,
    CASE WHEN ret_n_20 = 20 THEN ret_sd_20 END AS vol_20,
    CASE WHEN rn >= 20 THEN (volume - vol_mean_20) / NULLIF(vol_sd_20, 0.0) END AS volume_z
  FROM stoch
),

-- Mean, std and count over the last 20 rows of the indicators that get a z-score.
rolled AS (
  SELECT
    *,
    LAG(sma_20, 1) OVER (PARTITION BY ticker ORDER BY date) AS sma_20_1,
    LAG(sma_50, 1) OVER (PARTITION BY ticker ORDER BY date) AS sma_50_1,
    LAG(sma_200, 1) OVER (PARTITION BY ticker ORDER BY date) AS sma_200_1,
    LAG(ema_12, 1) OVER (PARTITION BY ticker ORDER BY date) AS ema_12_1,
    LAG(ema_26, 1) OVER (PARTITION BY ticker ORDER BY date) AS ema_26_1,
    LAG(rsi_14, 1) OVER (PARTITION BY ticker ORDER BY date) AS rsi_14_1,
    LAG(macd, 1) OVER (PARTITION BY ticker ORDER BY date) AS macd_1,
    LAG(macd_hist, 1) OVER (PARTITION BY ticker ORDER BY date) AS macd_hist_1,
    LAG(kdj_k, 1) OVER (PARTITION BY ticker ORDER BY date) AS kdj_k_1,
    COUNT(rsi_14) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS rsi_14_n,
    AVG(rsi_14) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS rsi_14_m,
    STDDEV_POP(rsi_14) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS rsi_14_s,
    COUNT(macd) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS macd_n,
    AVG(macd) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS macd_m,
    STDDEV_POP(macd) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS macd_s,
    COUNT(macd_hist) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS macd_hist_n,
    AVG(macd_hist) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS macd_hist_m,
    STDDEV_POP(macd_hist) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS macd_hist_s,
    COUNT(atr_14) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS atr_14_n,
    AVG(atr_14) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS atr_14_m,
    STDDEV_POP(atr_14) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS atr_14_s,
    COUNT(kdj_j) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS kdj_j_n,
    AVG(kdj_j) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS kdj_j_m,
    STDDEV_POP(kdj_j) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS kdj_j_s,
    COUNT(vol_20) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS vol_20_n,
    AVG(vol_20) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS vol_20_m,
    STDDEV_POP(vol_20) OVER (PARTITION BY ticker ORDER BY date ROWS BETWEEN 19 PRECEDING AND CURRENT ROW) AS vol_20_s
  FROM main
)

SELECT
  ticker, date, open, high, low, close, volume, adj_close,
  sma_20, sma_50, sma_100, sma_200,
  ema_12, ema_26,
  rsi_14,
  macd, macd_signal, macd_hist,
  atr_14,
  bb_upper, bb_middle, bb_lower,
  kdj_k, kdj_d, kdj_j,
  zscore_20, vwap_20,
  ret_1d, ret_5d, ret_20d,
  vol_20,
  -- Price levels get a relative slope; oscillators (which cross 0 or are bounded) a difference.
  sma_20 / NULLIF(sma_20_1, 0.0) - 1.0 AS sma_20_slope,
  sma_50 / NULLIF(sma_50_1, 0.0) - 1.0 AS sma_50_slope,
  sma_200 / NULLIF(sma_200_1, 0.0) - 1.0 AS sma_200_slope,
  ema_12 / NULLIF(ema_12_1, 0.0) - 1.0 AS ema_12_slope,
  ema_26 / NULLIF(ema_26_1, 0.0) - 1.0 AS ema_26_slope,
  rsi_14 - rsi_14_1 AS rsi_14_slope,
  macd - macd_1 AS macd_slope,
  macd_hist - macd_hist_1 AS macd_hist_slope,
  kdj_k - kdj_k_1 AS kdj_k_slope,
  CASE WHEN rsi_14_n = 20 THEN (rsi_14 - rsi_14_m) / NULLIF(rsi_14_s, 0.0) END AS rsi_14_z,
  CASE WHEN macd_n = 20 THEN (macd - macd_m) / NULLIF(macd_s, 0.0) END AS macd_z,
  CASE WHEN macd_hist_n = 20 THEN (macd_hist - macd_hist_m) / NULLIF(macd_hist_s, 0.0) END AS macd_hist_z,
  CASE WHEN atr_14_n = 20 THEN (atr_14 - atr_14_m) / NULLIF(atr_14_s, 0.0) END AS atr_14_z,
  CASE WHEN kdj_j_n = 20 THEN (kdj_j - kdj_j_m) / NULLIF(kdj_j_s, 0.0) END AS kdj_j_z,
  CASE WHEN vol_20_n = 20 THEN (vol_20 - vol_20_m) / NULLIF(vol_20_s, 0.0) END AS vol_20_z,
  volume_z
FROM rolled
ORDER BY ticker, date
