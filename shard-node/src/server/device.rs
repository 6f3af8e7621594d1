//! The node's device handle, held only while something lives on the device.
//!
//! On CUDA, freeing every buffer is not enough for the memory to leave the process: the CUDA
//! context itself, the kernels loaded into it, cuBLAS' workspace and the chunks of the
//! stream-ordered pool that a live buffer pins stay reserved (measured on an H100: 753 MiB
//! held after everything was freed, against 595 MiB for a bare context). So once the node
//! holds nothing and no handle to the device is left but its own, it drops its handle: the
//! primary context is released and the driver takes back all of it. The next load opens the
//! device again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;
use common::device::{cuda_handles, DeviceSpec};

use super::state::lock;

/// An open device and what it looked like when opened.
#[derive(Debug)]
struct Open {
    device: Device,
    /// Handles right after opening (the device's own).
    idle_handles: Option<usize>,
    /// Last handed out.
    used: Instant,
}

/// The device, opened on demand and closed when unused.
#[derive(Debug)]
pub struct DeviceSlot {
    spec: DeviceSpec,
    open: Mutex<Option<Open>>,
    /// `(free, total)` as last measured while open.
    last: Mutex<Option<(u64, u64)>>,
}

impl DeviceSlot {
    /// A slot holding `device`, already opened from `spec`.
    pub fn new(spec: DeviceSpec, device: Device) -> Self {
        let slot = DeviceSlot {
            spec,
            open: Mutex::new(None),
            last: Mutex::new(None),
        };
        *lock(&slot.open) = Some(Open::new(device));
        slot.memory();
        slot
    }

    /// The device, opening it if it was closed.
    pub fn get(&self) -> common::Result<Device> {
        let mut g = lock(&self.open);
        match g.as_mut() {
            Some(o) => {
                o.used = Instant::now();
                Ok(o.device.clone())
            }
            None => {
                // Count the device's own handles before any clone is handed out.
                let open = Open::new(self.spec.open()?);
                tracing::info!(device = %self.spec, "device opened");
                let device = open.device.clone();
                *g = Some(open);
                Ok(device)
            }
        }
    }

    /// The device if it is open (never opens it).
    pub fn current(&self) -> Option<Device> {
        lock(&self.open).as_ref().map(|o| o.device.clone())
    }

    /// Whether the device is open.
    pub fn is_open(&self) -> bool {
        lock(&self.open).is_some()
    }

    /// `(free, total)` bytes of the device: measured if it is open, else as last measured.
    pub fn memory(&self) -> Option<(u64, u64)> {
        match self.current() {
            Some(d) => {
                let m = common::memory::device_memory(&d);
                if m.is_some() {
                    *lock(&self.last) = m;
                }
                m
            }
            None => *lock(&self.last),
        }
    }

    /// Bytes in use as [`common::memory::in_use`] counts them (the last figures if closed).
    pub fn in_use(&self) -> u64 {
        match self.current() {
            Some(d) => common::memory::in_use(&d),
            None => self.memory().map_or(0, |(f, t)| t.saturating_sub(f)),
        }
    }

    /// Closes the device if nothing but the slot refers to it and it was not handed out for
    /// `grace`. CPU devices stay open (there is nothing to give back). Returns whether it
    /// closed.
    pub fn close_if_unused(&self, grace: Duration) -> bool {
        let mut g = lock(&self.open);
        let Some(o) = g.as_ref() else {
            return false;
        };
        let (Some(idle), Some(now)) = (o.idle_handles, cuda_handles(&o.device)) else {
            return false;
        };
        if now != idle || o.used.elapsed() < grace {
            return false;
        }
        // Measure once more, so that status has figures while closed.
        if let Some(m) = common::memory::device_memory(&o.device) {
            *lock(&self.last) = Some(m);
        }
        if let Some(o) = g.take() {
            common::memory::close_device(o.device);
        }
        tracing::info!(device = %self.spec, "device closed: nothing lives on it");
        true
    }

    /// `(handles now, handles when opened)`, while open on CUDA: equal when nothing but the
    /// node's own handle refers to the device.
    pub fn handles(&self) -> Option<(usize, usize)> {
        let g = lock(&self.open);
        let o = g.as_ref()?;
        Some((cuda_handles(&o.device)?, o.idle_handles?))
    }
}

impl Open {
    fn new(device: Device) -> Self {
        Open {
            idle_handles: cuda_handles(&device),
            device,
            used: Instant::now(),
        }
    }
}
