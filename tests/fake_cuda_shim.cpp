// Copyright (c) mmcbn contributors. All rights reserved.
//
// A CPU-only torch that believes in one CUDA device (tests/fake_cuda.py).
//
// Tensors can claim device 'cuda:0' on a CPU build (a wrapper subclass does,
// holding CPU data), but autograd then asks for what only a CUDA build has:
//
// - a device guard for CUDA (every autograd node records its inputs' device
//   and stream): a no-op one, one device, one default stream;
// - CUDA hooks that say CUDA is built (the engine picks the streams of the
//   "accelerator"; with none it refuses a CUDA gradient): hooks that do
//   nothing else.
//
// No kernel is registered: every CUDA operator is still missing, so nothing
// can run on "CUDA" unless the wrapper computes it. The hooks must be in the
// registry before torch first asks for them, which happens while `import
// torch` runs: load this library and call both functions first, in a fresh
// process (tests/cuda_audit_child.py). Never load it into a CUDA build.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <memory>

namespace {

using c10::Device;
using c10::DeviceType;
using c10::Stream;

const Device kDevice(DeviceType::CUDA, 0);

struct FakeCudaGuard final
    : public c10::impl::NoOpDeviceGuardImpl<DeviceType::CUDA> {
  Device exchangeDevice(Device) const override { return kDevice; }
  Device getDevice() const override { return kDevice; }
  Stream getStream(Device) const noexcept override {
    return Stream(Stream::DEFAULT, kDevice);
  }
  Stream getDefaultStream(Device) const override {
    return Stream(Stream::DEFAULT, kDevice);
  }
  Stream exchangeStream(Stream) const noexcept override {
    return Stream(Stream::DEFAULT, kDevice);
  }
};

const FakeCudaGuard guard;

struct FakeCudaHooks final : public at::CUDAHooksInterface {
  void init() const override {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
};

}  // namespace

// Register the guard and the hooks. Returns 1 if both are (now) in place,
// 0 if a real CUDA guard was there already (a CUDA build: nothing done).
extern "C" int fake_cuda_install() {
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(
      DeviceType::CUDA)];
  const c10::impl::DeviceGuardImplInterface* none = nullptr;
  if (!slot.compare_exchange_strong(none, &guard) && slot.load() != &guard) {
    return 0;
  }
  static bool hooks_registered = false;
  if (!hooks_registered) {
    hooks_registered = true;
    at::CUDAHooksRegistry()->Register(
        "CUDAHooks", [](at::CUDAHooksArgs) -> std::unique_ptr<
                         at::CUDAHooksInterface> {
          return std::make_unique<FakeCudaHooks>();
        });
  }
  return 1;
}

// Whether torch uses the fake hooks (false if it asked before the install).
extern "C" int fake_cuda_active() {
  return at::detail::getCUDAHooks().isBuilt() ? 1 : 0;
}
