#!/usr/bin/env bash
# The H100 runs behind benchmarks/results/*.json. Usage: bash benchmarks/gpu_run.sh SECTION...
# Sections: profile (config A, 3 traced steps per mode), final, train_a, peers_a, infer_a, remat, scan, b, llama.
# This session ran: profile infer_a llama | train_a peers_a infer_a | b remat scan llama | final, and
# inference A with merged,unmerged,unmerged_factored (inference_A_forms.json).
# On the H200 (2026-12-02): multi (the decoder then passed its cache through the scan), base under each
# cache form (and a multiply-and-sum attention, since removed), every mode with --cache-form carry,
# qlora_decode, then the decode modes with the default xs form (multi_adapter_h200_decode_xs.json).
# Then (2026-12-02, issue 14): kernels fused_a, and llama8b lora alone (train_llama8b_lora_h200.json).
# Ready, not yet run (2026-12-03): next25 and next26, one device call each. fold25 (2026-12-03).
# 2026-12-04 (the device's clock): now26, peer26, dsf26, graphs (its unrolled step failed: --override could not
# switch scan off then), unrolled, and the unrolled step with --policy mlp by hand (train_llama8b_unrolled_mlp_h200.json).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
export XLA_FLAGS="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune ${XLA_FLAGS:-}"
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T="python3 -m benchmarks.train_step --steps 10 --warmup 3 --parallel"
I="python3 -m benchmarks.inference --steps 20 --warmup 3 --parallel"
for section in "$@"; do
  echo "=== $section $(date +%T)"
  case $section in
    profile)
      timeout 200 $T --config A --modes full,lora,lora_factored,frozen --timeout 190 --profile $OUT/prof_A --out $OUT/train_A.json
      python3 -m benchmarks.trace_summary $OUT/prof_A_*.trace.json.gz --out $OUT/prof_A_summary.json > $OUT/prof_A_summary.txt
      grep -A3 "ms/step" $OUT/prof_A_summary.txt | grep -v "^ *[0-9]" | head -40 ;;
    final)  # the two headline configs on the final code
      timeout 150 $T --config B --modes full,lora --timeout 140 --out $OUT/train_B.json
      timeout 150 $T --config A --modes full,lora --timeout 140 --out $OUT/train_A_final.json ;;
    train_a) timeout 200 $T --config A --modes full,lora,lora_single,lora_factored,frozen --timeout 190 --out $OUT/train_A.json ;;
    peers_a) timeout 200 $T --config A --modes full,nnx,merge --timeout 190 --out $OUT/train_A_peers.json ;;
    infer_a) timeout 120 $I --config A --modes merged,unmerged,unmerged_factored,merge,merge_donated,copy --timeout 110 --out $OUT/inference_A.json ;;
    remat) timeout 130 $T --config A --remat --modes full,lora,lora_factored --timeout 120 --out $OUT/train_A_remat.json ;;
    scan) timeout 130 $T --config A --scan --modes full,lora,lora_factored --timeout 120 --out $OUT/train_A_scan.json ;;
    b) timeout 130 $T --config B --modes full,lora,lora_single --timeout 120 --out $OUT/train_B.json ;;
    llama)
      timeout 200 python3 -m benchmarks.train_step --config llama8b --modes lora --steps 5 --warmup 2 --window 3 --timeout 190 --out $OUT/train_llama8b_lora.json
      timeout 90 python3 -m benchmarks.train_step --config llama8b --modes full --steps 3 --warmup 1 --timeout 80 --out $OUT/train_llama8b_full.json ;;
    multi_forms)  # issue 11: base and mixed8 decode under each cache form, profiled
      M="python3 -m benchmarks.multi_adapter --config llama8b --modes base,mixed8 --timeout 80 --budget 150"
      for f in xs carry; do timeout 160 $M --cache-form $f --profile /tmp/p_$f --out $OUT/decode_form_h200_$f.json; done
      for t in /tmp/p_*.trace.json.gz; do python3 -m benchmarks.trace_summary $t; done > $OUT/decode_forms_profiles.txt 2>&1 ;;
    multi) timeout 560 python3 -m benchmarks.multi_adapter --config llama8b --budget 545 --timeout 150 --out $OUT/multi_adapter_h200.json ;;
    qlora_decode) timeout 300 python3 -m benchmarks.qlora --modes decode_bf16,decode_nf4 --big "" --timeout 140 --out $OUT/qlora_decode_h200.json ;;
    kernels)  # issue 14: the fused Pallas GEMM's own test on the device, then it against the library GEMM
      timeout 150 python3 -m pytest tests/test_fused.py -q -p no:cacheprovider 2>&1 | tail -3
      timeout 200 python3 -m benchmarks.kernels --config A --repeats 10 --out $OUT/kernels_A_h200.json ;;
    fused_a) timeout 240 $T --config A --modes full,lora,lora_fused --timeout 230 --out $OUT/train_A_fused_h200.json ;;
    next25)  # issue 25 in one device call (under 10 min): the kernel's GPU test, the layer read in place against
      # the slice, the diagnostics and their profiles, then the 8B decode (docs/performance.md, "Ready")
      timeout 120 python3 -m pytest tests/test_qmatmul.py -q -p no:cacheprovider -k compiled_kernel 2>&1 | tail -3
      XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false" timeout 200 python3 -m benchmarks.qdecode \
        --batches 1 16 --modes bf16 int8_kernel int8_kernel_sliced int8_kernel_read_only int8_codes_xla \
        nf4_kernel nf4_kernel_sliced nf4_kernel_read_only nf4_codes_xla --profile $OUT/q --out $OUT/qdecode_h200_in_place.json
      python3 -m benchmarks.trace_summary $OUT/q_*.trace.json.gz > $OUT/qdecode_h200_in_place_profiles.txt 2>&1
      timeout 240 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 --big "" \
        --decode-batches 1,8,64 --timeout 110 --profile $OUT/d --out $OUT/qlora_decode_h200_in_place.json
      python3 -m benchmarks.trace_summary $OUT/d_*.trace.json.gz > $OUT/qlora_decode_h200_in_place_profiles.txt 2>&1 ;;
    next26)  # issue 26's remaining peers and policy (under 10 min)
      timeout 280 python3 -m benchmarks.train_step --config B --modes full,lora,peft_compiled --lora-dtype bfloat16 \
        --parallel --timeout 270 --out $OUT/train_B_bf16_peers_h200.json
      timeout 150 python3 -m benchmarks.train_step --config llama8b --modes lora --lora-dtype bfloat16 --policy mlp \
        --timeout 140 --out $OUT/train_llama8b_bf16_mlp_h200.json
      timeout 160 python3 -m benchmarks.train_step --config llama8b --modes peft_ckpt,peft_compiled_ckpt \
        --lora-dtype float32 --timeout 150 --out $OUT/train_llama8b_peft_f32_ckpt_h200.json ;;
    summed25)  # issue 25 (run 2026-12-03): XLA's multiply-and-sum against the kernel, a short re-sweep of the
      # kernel now that it reads layers in place, then the 8B decode with the kernel (the summed form, a
      # library switch then, lost 2-10x and was removed: qlora_decode_h200_summed.json)
      XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false" timeout 230 python3 -m benchmarks.qdecode \
        --batches 1 4 16 --modes bf16 int8_kernel int8_reduce_xla nf4_kernel nf4_reduce_xla nf4nodq_reduce_xla \
        --sweep 128,128,4,3,4096,1,loop 128,256,8,3,4096,1,loop 32,128,4,1,4096,1,loop 128,128,4,3,4096,1,tree \
        128,128,4,3,4096,1,words+tree 64,256,4,3,1024,1,words 256,256,8,3,2048,1,loop 128,512,8,3,4096,1,loop \
        --sweep-batches 1 16 --sweep-budget 110 --out $OUT/qdecode_h200_summed.json
      for s in kernel:128,128,4,3,4096,1,loop; do
        timeout 150 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 --big "" \
          --decode-batches 1,4,16 --qmatmul "${s#*:}" --timeout 140 --out $OUT/qlora_decode_h200_${s%%:*}.json
      done ;;
    rows25)  # issue 25: the kernel past 16 rows now that it reads layers in place (MAX_ROWS, flag rowsN)
      XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false" timeout 200 python3 -m benchmarks.qdecode \
        --batches 32 64 128 --modes bf16 int8_xla int8_kernel nf4_xla nf4_kernel \
        --sweep 128,128,4,3,4096,1,loop 64,128,4,3,4096,1,loop 128,128,8,3,4096,1,loop 128,128,4,3,1024,1,loop \
        --sweep-batches 64 --sweep-budget 60 --out $OUT/qdecode_h200_rows.json
      timeout 200 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 --big "" \
        --decode-batches 16,32,64,128 --qmatmul 128,128,4,3,4096,1,rows64 --timeout 190 \
        --out $OUT/qlora_decode_h200_rows64.json ;;
    splits25)  # issue 25: warps, stages and programs at 1, 16 and 64 rows on the gate/up and the down shapes
      # (the kernels ran at 166-255 registers a thread, 12-19% occupancy, in the 8B int8 decode trace)
      S="128,128,4,3,4096,1,loop 128,128,8,3,4096,1,loop 128,128,8,1,4096,1,loop 128,128,4,1,1024,1,loop
         128,128,8,1,1024,1,loop 128,128,8,3,1024,1,loop 128,128,8,1,512,1,loop 64,128,4,1,1024,1,loop
         128,128,8,3,2048,1,loop 128,128,4,3,4096,1,reduce"
      for shape in 32,4096,14336 32,14336,4096; do
        XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false" timeout 240 python3 -m benchmarks.qdecode \
          --shape $shape --batches 1 --modes bf16 --sweep $S --sweep-batches 1 16 64 --sweep-budget 200 \
          --copy-mib 1024 --out $OUT/qdecode_h200_splits_${shape//,/x}.json | grep -v '"sweep": {'
      done ;;
    tiles25)  # issue 25: the many-row settings (TILE_M...) and divisor splits: the GPU test, then the 8B decode
      timeout 150 python3 -m pytest tests/test_qmatmul.py -q -p no:cacheprovider -k compiled_kernel 2>&1 | tail -3
      timeout 200 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 --big "" \
        --decode-batches 1,4,16,64 --timeout 190 --out $OUT/qlora_decode_h200_tiles.json ;;
    fold25)  # (run 2026-12-03; the presets fold_rows and fold_sum are gone with what they timed: the result
      # files hold their settings) issue 25: the folded kernel (`_gemv_kernel`): its GPU test, a one-row sweep on both 8B MLP shapes
      # (the first chooses), a sweep at 4 and 8 rows, then the 8B decode at batch 1 with the one-row choice
      timeout 90 python3 -m pytest tests/test_qmatmul.py -q -p no:cacheprovider -x -k "compiled_kernel and not tile and not select" 2>&1 | tail -3
      Q="python3 -m benchmarks.qdecode --copy-mib 1024 --sweep-batches 1"
      export XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false"
      timeout 170 $Q --batches 1 --modes bf16 int8_kernel nf4_kernel nf4_kernel_read_only int8_codes_xla nf4_codes_xla \
        --sweep-preset fold --sweep-budget 110 --out $OUT/qdecode_h200_fold.json | grep -v '"sweep": {'
      chosen=$(python3 -c "import json; print(json.load(open('$OUT/qdecode_h200_fold.json'))['qmatmul_setting'])")
      echo "chosen: $chosen"
      timeout 80 $Q --shape 32,14336,4096 --batches 1 --modes bf16 int8_kernel nf4_kernel --sweep "$chosen" \
        128,128,4,3,4096,1,tile 16,512,4,1,1024,1,one 8,512,4,1,1024,1,one 16,256,4,1,2048,1,one \
        --sweep-budget 40 --out $OUT/qdecode_h200_fold_down.json | grep -v '"sweep": {'
      timeout 80 $Q --batches 4 --modes bf16 --sweep-preset fold_rows --sweep-batches 4 8 --sweep-budget 55 \
        --out $OUT/qdecode_h200_fold_rows.json | grep -v '"sweep": {'
      export XLA_FLAGS="${XLA_FLAGS% --xla_gpu_enable_triton_gemm=false}"
      timeout 120 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 --big "" \
        --decode-batches 1 --qmatmul "$chosen" --timeout 110 --out $OUT/qlora_decode_h200_fold.json ;;
    sum25)  # (run 2026-12-03, see fold25) issue 25: the folded kernel summing each step's rows at once (FOLD_SUM): GPU test, one-row sweep on
      # both 8B MLP shapes (the first chooses), then the 8B decode at 1, 4, 16, 64 rows with the choice
      timeout 90 python3 -m pytest tests/test_qmatmul.py -q -p no:cacheprovider -k "compiled_kernel and not tile and not select" 2>&1 | tail -3
      Q="python3 -m benchmarks.qdecode --copy-mib 1024 --sweep-batches 1"
      export XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_triton_gemm=false"
      timeout 170 $Q --batches 1 --modes bf16 int8_kernel nf4_kernel nf4_kernel_read_only \
        --sweep-preset fold_sum --sweep-budget 120 --out $OUT/qdecode_h200_fold_sum.json | grep -v '"sweep": {'
      chosen=$(python3 -c "import json; print(json.load(open('$OUT/qdecode_h200_fold_sum.json'))['qmatmul_setting'])")
      echo "chosen: $chosen"
      timeout 70 $Q --shape 32,14336,4096 --batches 1 --modes bf16 int8_kernel nf4_kernel --sweep "$chosen" \
        16,512,4,1,1024,1,one 8,2048,2,1,1024,1,one+sum 16,2048,2,1,512,1,one+sum \
        --sweep-budget 35 --out $OUT/qdecode_h200_fold_sum_down.json | grep -v '"sweep": {'
      export XLA_FLAGS="${XLA_FLAGS% --xla_gpu_enable_triton_gemm=false}"
      timeout 200 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 --big "" \
        --decode-batches 1,4,16,64 --qmatmul "$chosen" --timeout 190 --out $OUT/qlora_decode_h200_fold_sum.json ;;
    last25)  # issue 25: which layout fails the GPU test under two variants (diagnostic), the 8B QLoRA step
      # without remat (the backward keeps the codes), then the 70B QLoRA at 6 x 4,096 if time is left
      timeout 90 python3 benchmarks/diag/qmatmul_gpu_failures.py 16,256,4,1,8,0,fold4+prefetch2 \
        8,1024,2,1,8,0,one+sum+fold4 16,256,4,1,8,0,prefetch2 2>&1 | grep -v "^WARNING\|Deprecat" | grep -v " ok$"
      timeout 220 python3 -m benchmarks.qlora --modes train_bf16,train_nf4 --big '' --policy none --timeout 200 \
        --out $OUT/qlora_train_h200_no_remat.json
      timeout 250 python3 -m benchmarks.qlora --modes '' --big llama70b --batches 6 --timeout 240 \
        --out $OUT/qlora_70b_h200_b6.json ;;
    final25)  # issue 25, the defaults as shipped: the GPU test (every variant now traced afresh), the 8B decode
      timeout 120 python3 -m pytest tests/test_qmatmul.py -q -p no:cacheprovider -k compiled_kernel 2>&1 | tail -3
      timeout 220 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 --big "" \
        --decode-batches 1,4,16,64 --timeout 210 --out $OUT/qlora_decode_h200_final.json ;;
    test25)  # the compiled kernel's GPU test alone (final25's timed out in its last variant)
      timeout 280 python3 -m pytest tests/test_qmatmul.py -q -p no:cacheprovider -k compiled_kernel -rf --tb=line 2>&1 | tail -8 ;;
    now26)  # issue 25's 70B at 7 x 4,096; issue 26: the 8B LoRA step (outputs, bf16 factors) and the frozen
      # forward profiled, with the compiled HLO (what XLA merges, where the time goes)
      timeout 250 python3 -m benchmarks.qlora --modes '' --big llama70b --batches 7 --timeout 240 \
        --out $OUT/qlora_70b_h200_b7.json
      timeout 260 python3 -m benchmarks.train_step --config llama8b --modes lora,frozen --policy outputs \
        --lora-dtype bfloat16 --steps 5 --warmup 2 --timeout 240 --profile /tmp/p8 --out $OUT/train_llama8b_profiled_h200.json
      python3 -m benchmarks.trace_summary /tmp/p8_*.trace.json.gz > $OUT/train_llama8b_profiled_h200.txt 2>&1
      for h in /tmp/p8_*.hlo.txt; do gzip -c "$h" > $OUT/$(basename "$h" | tr @ _).gz; done ;;
    peer26)  # issue 26: XLA groups the shrink products on the GPU (test), then PEFT's last peer (its compile is long)
      timeout 90 python3 -m pytest tests/test_matmul.py -q -p no:cacheprovider -k on_a_gpu -rs 2>&1 | tail -3
      timeout 490 python3 -m benchmarks.train_step --config llama8b --modes peft_compiled_ckpt --lora-dtype float32 \
        --timeout 480 --out $OUT/train_llama8b_peft_compiled_f32_ckpt_h200.json ;;
    dsf26)  # issue 26: the scan's weight slices are copied out for cuBLAS (memcpy128, 16.7 ms a step): XLA's dynamic
      # slice fusion reads them in place. The 8B step (outputs, bf16 factors) and the bf16 decode, without and with it
      for f in "" "--xla_gpu_enable_dynamic_slice_fusion=true"; do
        tag=$([ -n "$f" ] && echo _dsf)
        XLA_FLAGS="$XLA_FLAGS $f" timeout 150 python3 -m benchmarks.train_step --config llama8b --modes lora \
          --policy outputs --lora-dtype bfloat16 --steps 5 --warmup 2 --timeout 140 --profile /tmp/s$tag \
          --out $OUT/train_llama8b_outputs_bf16${tag}_h200.json | grep -v "^ *$"
        python3 -m benchmarks.trace_summary /tmp/s${tag}_*.trace.json.gz | head -8
        XLA_FLAGS="$XLA_FLAGS $f" timeout 120 python3 -m benchmarks.qlora --modes decode_bf16 --big "" \
          --decode-batches 1,16 --timeout 110 --out $OUT/decode_bf16${tag}_h200.json | grep -i "decode_bf16\|ms"
      done ;;
    graphs)  # decode with XLA's command buffers taking the layer loop too (CUDA graphs: fewer launches), against
      # the defaults in the same call; then the 8B step with its layers unrolled (no weight slice copied out of the scan)
      CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
      for f in "" "$CB"; do
        tag=$([ -n "$f" ] && echo graphs || echo default)
        XLA_FLAGS="$XLA_FLAGS $f" timeout 150 python3 -m benchmarks.qlora --modes decode_bf16,decode_int8,decode_nf4 \
          --big "" --decode-batches 1,16 --timeout 140 --out $OUT/qlora_decode_h200_$tag.json | grep "batch"
      done
      timeout 200 python3 -m benchmarks.train_step --config llama8b --modes lora --policy outputs --lora-dtype bfloat16 \
        --override '{"scan": false}' --steps 5 --warmup 2 --timeout 190 --out $OUT/train_llama8b_unrolled_h200.json
      timeout 150 python3 -m benchmarks.train_step --config llama8b --modes peft_ckpt --lora-dtype float32 --steps 5 \
        --warmup 2 --timeout 140 --out $OUT/train_llama8b_peft_eager_f32_ckpt_h200.json ;;
    unrolled)  # the 8B step (outputs, bf16 factors) with its layers unrolled, then scanned, in one call
      for o in '{"scan": false}' '{}'; do
        tag=$([ "$o" = '{}' ] && echo scanned || echo unrolled)
        timeout 220 python3 -m benchmarks.train_step --config llama8b --modes lora --policy outputs --lora-dtype bfloat16 \
          --override "$o" --steps 5 --warmup 2 --timeout 210 --out $OUT/train_llama8b_${tag}_h200.json | grep -v "^ *$"
      done ;;
    *) echo "unknown section $section" ;;
  esac
done
ls -la $OUT
