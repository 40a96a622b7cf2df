# Per-file instruction-set flags for the CPU kernels. A source named *_avx2.cpp is
# compiled for AVX2+FMA+F16C, *_avx512.cpp for AVX-512 (F/BW/VL/DQ/VNNI/BF16); everything
# else for the baseline ISA. The kernels pick a path at run time (cpu_features), so the
# library runs on any x86-64 CPU and the fast paths are only entered where supported.
# Sets MMFREE_CPU_ISAS (the list compiled) and the function mmfree_apply_isa_flags().

include(CheckCXXCompilerFlag)
set(MMFREE_AVX2_FLAGS -mavx2 -mfma -mf16c -mbmi2)
set(MMFREE_AVX512_FLAGS -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16 ${MMFREE_AVX2_FLAGS})

set(MMFREE_CPU_ISAS scalar)
set(MMFREE_HAVE_AVX2 OFF)
set(MMFREE_HAVE_AVX512 OFF)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  check_cxx_compiler_flag("-mavx2 -mfma -mf16c" MMFREE_COMPILER_AVX2)
  check_cxx_compiler_flag("-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512bf16" MMFREE_COMPILER_AVX512)
  if(MMFREE_COMPILER_AVX2)
    set(MMFREE_HAVE_AVX2 ON)
    list(APPEND MMFREE_CPU_ISAS avx2)
  endif()
  if(MMFREE_COMPILER_AVX512)
    set(MMFREE_HAVE_AVX512 ON)
    list(APPEND MMFREE_CPU_ISAS avx512)
  endif()
endif()

# Drop ISA sources the compiler cannot build and add the flags to the rest.
function(mmfree_apply_isa_flags out_var)
  set(kept "")
  foreach(src ${ARGN})
    if(src MATCHES "_avx512\\.cpp$")
      if(MMFREE_HAVE_AVX512)
        set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${MMFREE_AVX512_FLAGS}")
        list(APPEND kept ${src})
      endif()
    elseif(src MATCHES "_avx2\\.cpp$")
      if(MMFREE_HAVE_AVX2)
        set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "${MMFREE_AVX2_FLAGS}")
        list(APPEND kept ${src})
      endif()
    else()
      list(APPEND kept ${src})
    endif()
  endforeach()
  set(${out_var} ${kept} PARENT_SCOPE)
endfunction()
