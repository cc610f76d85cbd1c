-- Indicators per ticker, in date order, from the table `bars` (schema ohlcv).
-- Output: schema `indicators` (schemas/indicators.yaml documents every column and its
-- warm-up). Run by stages/market/src/indicators/engine.rs on groups of whole tickers.
--
-- Every window function here is a user-defined one evaluated once per ticker (see
-- src/indicators/udwf.rs): the recursive ones follow TA-Lib's seeding (ta_ema, ta_macd_line,
-- ta_macd_signal, ta_rsi, ta_atr, ta_stoch_k/_d; src/indicators/talib.rs), the rolling ones
-- (ta_sma, ta_sum, ta_stddev, ta_stddev_samp, ta_zscore; src/indicators/rolling.rs) reduce
-- the last n rows and are NULL unless all n are present, which gives every warm-up. Every
-- window is PARTITION BY ticker ORDER BY date and looks only at the current and earlier rows,
-- so nothing here can see the future. The input is declared sorted by (ticker, date), so
-- DataFusion neither sorts nor repartitions.

WITH base AS (
  SELECT
    ticker, date, open, high, low, close, volume, adj_close,
    ta_sma(close, 20) OVER w AS sma_20,
    ta_sma(close, 50) OVER w AS sma_50,
    ta_sma(close, 100) OVER w AS sma_100,
    ta_sma(close, 200) OVER w AS sma_200,
    -- BBANDS and the z-score use the population std (TA-Lib STDDEV), not the sample one.
    ta_stddev(close, 20) OVER w AS sd_20,
    ta_zscore(close, 20) OVER w AS zscore_20,
    ta_zscore(volume, 20) OVER w AS volume_z,
    ta_sum((high + low + close) / 3.0 * volume, 20) OVER w AS pv_20,
    ta_sum(volume, 20) OVER w AS v_20,
    LAG(close, 1) OVER w AS close_1,
    LAG(close, 5) OVER w AS close_5,
    LAG(close, 20) OVER w AS close_20,
    ta_ema(close, 12) OVER w AS ema_12,
    ta_ema(close, 26) OVER w AS ema_26,
    ta_rsi(close, 14) OVER w AS rsi_14,
    ta_atr(high, low, close, 14) OVER w AS atr_14,
    -- MACD(12, 26, 9): both EMAs seeded on row 26, TA-Lib's alignment; the signal is the
    -- EMA 9 of the line, seeded on its first 9 values.
    ta_macd_line(close, 12, 26) OVER w AS macd_line,
    ta_macd_signal(close, 12, 26, 9) OVER w AS macd_signal,
    -- KDJ(9, 3, 3) = TA-Lib STOCH(9, 5, EMA, 5, EMA): EMA period 5 has k = 1/3; %K and %D
    -- start on the same row, as TA-Lib outputs them.
    ta_stoch_k(high, low, close, 9, 5, 5) OVER w AS kdj_k,
    ta_stoch_d(high, low, close, 9, 5, 5) OVER w AS kdj_d
  FROM bars
  WINDOW w AS (PARTITION BY ticker ORDER BY date)
),

main AS (
  SELECT
    ticker, date, open, high, low, close, volume, adj_close,
    sma_20, sma_50, sma_100, sma_200,
    ema_12, ema_26,
    rsi_14,
    -- TA-Lib MACD starts all three outputs where the signal starts.
    CASE WHEN macd_signal IS NOT NULL THEN macd_line END AS macd,
    macd_signal,
    macd_line - macd_signal AS macd_hist,
    atr_14,
    sma_20 + 2.0 * sd_20 AS bb_upper,
    sma_20 AS bb_middle,
    sma_20 - 2.0 * sd_20 AS bb_lower,
    kdj_k, kdj_d,
    3.0 * kdj_k - 2.0 * kdj_d AS kdj_j,
    zscore_20,
    pv_20 / NULLIF(v_20, 0.0) AS vwap_20,
    close / NULLIF(close_1, 0.0) - 1.0 AS ret_1d,
    close / NULLIF(close_5, 0.0) - 1.0 AS ret_5d,
    close / NULLIF(close_20, 0.0) - 1.0 AS ret_20d,
    volume_z
  FROM base
),

-- Previous values for the slopes, the 20-row z-scores of the indicators, the volatility.
rolled AS (
  SELECT
    *,
    ta_stddev_samp(ret_1d, 20) OVER w AS vol_20,
    LAG(sma_20, 1) OVER w AS sma_20_1,
    LAG(sma_50, 1) OVER w AS sma_50_1,
    LAG(sma_200, 1) OVER w AS sma_200_1,
    LAG(ema_12, 1) OVER w AS ema_12_1,
    LAG(ema_26, 1) OVER w AS ema_26_1,
    LAG(rsi_14, 1) OVER w AS rsi_14_1,
    LAG(macd, 1) OVER w AS macd_1,
    LAG(macd_hist, 1) OVER w AS macd_hist_1,
    LAG(kdj_k, 1) OVER w AS kdj_k_1,
    ta_zscore(rsi_14, 20) OVER w AS rsi_14_z,
    ta_zscore(macd, 20) OVER w AS macd_z,
    ta_zscore(macd_hist, 20) OVER w AS macd_hist_z,
    ta_zscore(atr_14, 20) OVER w AS atr_14_z,
    ta_zscore(kdj_j, 20) OVER w AS kdj_j_z
  FROM main
  WINDOW w AS (PARTITION BY ticker ORDER BY date)
),

vol AS (
  SELECT
    *,
    ta_zscore(vol_20, 20) OVER (PARTITION BY ticker ORDER BY date) AS vol_20_z
  FROM rolled
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
  rsi_14_z, macd_z, macd_hist_z, atr_14_z, kdj_j_z, vol_20_z,
  volume_z
FROM vol
ORDER BY ticker, date
