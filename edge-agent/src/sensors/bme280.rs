//! Bosch BME280 (temperature, pressure, humidity) and BMP280 (no humidity) over I2C.
//!
//! The driver is generic over `embedded_hal::i2c::I2c` and `embedded_hal::delay::DelayNs`.
//! Registers are read with `write_read` (register pointer write, then read). rppal
//! implements that as two separate messages without a repeated start, which the BME280
//! accepts: the register pointer survives the stop condition.
//!
//! Settings follow the datasheet's "weather monitoring" recommendation: forced mode (one
//! conversion per `read()`, the chip sleeps in between and does not self-heat),
//! oversampling ×1 for every channel, IIR filter off. Compensation uses the datasheet's
//! integer formulas, evaluated in 64/128-bit arithmetic so that corrupt calibration data
//! cannot overflow (and panic) where the C reference would silently wrap.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use super::{Metric, Sensor, SensorError};

pub const ADDRESS_PRIMARY: u8 = 0x76;
pub const ADDRESS_SECONDARY: u8 = 0x77;

const REG_CALIB_TP: u8 = 0x88; // 0x88..=0xA1: dig_T*, dig_P*, (0xA0 unused), dig_H1
const REG_CHIP_ID: u8 = 0xD0;
const REG_CALIB_H: u8 = 0xE1; // 0xE1..=0xE7: dig_H2..dig_H6
const REG_CTRL_HUM: u8 = 0xF2;
const REG_STATUS: u8 = 0xF3;
const REG_CTRL_MEAS: u8 = 0xF4;
const REG_CONFIG: u8 = 0xF5;
const REG_DATA: u8 = 0xF7; // press[3], temp[3], hum[2] (BMP280: no hum)

const CHIP_ID_BME280: u8 = 0x60;
/// 0x58 in production parts; 0x56/0x57 were engineering samples that are still around.
const CHIP_IDS_BMP280: [u8; 3] = [0x56, 0x57, 0x58];

const OSRS_X1: u8 = 0b001;
const MODE_FORCED: u8 = 0b01;
const CTRL_MEAS_FORCED_X1: u8 = (OSRS_X1 << 5) | (OSRS_X1 << 2) | MODE_FORCED;
const CONFIG_FILTER_OFF: u8 = 0x00;
const STATUS_MEASURING: u8 = 1 << 3;

/// Typical conversion time at ×1 oversampling is 8 ms (datasheet 9.1), so wait that long
/// before the first status poll, then poll a bounded number of times.
const FIRST_POLL_DELAY_MS: u32 = 8;
const POLL_DELAY_MS: u32 = 2;
const MAX_POLLS: u32 = 10;

/// Raw values the chip reports when a channel was skipped or never converted.
const ADC_TP_SKIPPED: i32 = 0x80000;
const ADC_H_SKIPPED: i32 = 0x8000;

fn default_bus() -> u8 {
    1
}

fn default_address() -> u8 {
    ADDRESS_PRIMARY
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bme280Settings {
    /// I2C bus number: `/dev/i2c-<bus>`; bus 1 is the header pins 3/5 on every modern Pi.
    #[serde(default = "default_bus")]
    pub bus: u8,
    /// 0x76 (SDO to GND) or 0x77 (SDO to VDDIO).
    #[serde(default = "default_address")]
    pub address: u8,
}

impl Default for Bme280Settings {
    fn default() -> Self {
        Self {
            bus: default_bus(),
            address: default_address(),
        }
    }
}

impl Bme280Settings {
    /// `bme280@0x76`, with the bus only when it is not the usual bus 1.
    pub fn label(&self) -> String {
        if self.bus == default_bus() {
            format!("bme280@{:#04x}", self.address)
        } else {
            format!("bme280@i2c-{}:{:#04x}", self.bus, self.address)
        }
    }
}

fn validate_address(address: u8) -> Result<(), SensorError> {
    if address == ADDRESS_PRIMARY || address == ADDRESS_SECONDARY {
        Ok(())
    } else {
        Err(SensorError::InvalidConfig(format!(
            "BME280/BMP280 I2C address must be 0x76 or 0x77, not {address:#04x}"
        )))
    }
}

/// Which chip answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chip {
    Bme280,
    Bmp280,
}

impl Chip {
    fn from_id(address: u8, id: u8) -> Result<Self, SensorError> {
        if id == CHIP_ID_BME280 {
            Ok(Chip::Bme280)
        } else if CHIP_IDS_BMP280.contains(&id) {
            Ok(Chip::Bmp280)
        } else {
            Err(SensorError::WrongChipId { address, found: id })
        }
    }
}

/// Largest 20-bit raw temperature/pressure value.
const ADC20_MAX: i32 = 0xF_FFFF;
/// Bound of |t_fine| for any calibration and 20-bit input. Clamping the public inputs to
/// what the chip can produce keeps the arithmetic below free of overflow.
const T_FINE_LIMIT: i64 = 1 << 25;

/// Factory trimming parameters (datasheet table 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Calibration {
    pub t1: u16,
    pub t2: i16,
    pub t3: i16,
    pub p1: u16,
    pub p2: i16,
    pub p3: i16,
    pub p4: i16,
    pub p5: i16,
    pub p6: i16,
    pub p7: i16,
    pub p8: i16,
    pub p9: i16,
    pub h1: u8,
    pub h2: i16,
    pub h3: u8,
    pub h4: i16,
    pub h5: i16,
    pub h6: i8,
}

impl Calibration {
    /// Decodes registers 0x88..=0xA1 and, for a BME280, 0xE1..=0xE7.
    pub fn from_registers(tp: &[u8; 26], h: Option<&[u8; 7]>) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([tp[i], tp[i + 1]]);
        let i16_at = |i: usize| i16::from_le_bytes([tp[i], tp[i + 1]]);
        let mut cal = Calibration {
            t1: u16_at(0),
            t2: i16_at(2),
            t3: i16_at(4),
            p1: u16_at(6),
            p2: i16_at(8),
            p3: i16_at(10),
            p4: i16_at(12),
            p5: i16_at(14),
            p6: i16_at(16),
            p7: i16_at(18),
            p8: i16_at(20),
            p9: i16_at(22),
            h1: tp[25],
            ..Calibration::default()
        };
        if let Some(h) = h {
            cal.h2 = i16::from_le_bytes([h[0], h[1]]);
            cal.h3 = h[2];
            // dig_H4 and dig_H5 are signed 12-bit values sharing the nibbles of 0xE5;
            // their upper 8 bits (0xE4, 0xE6) carry the sign.
            cal.h4 = (i16::from(h[3] as i8) << 4) | i16::from(h[4] & 0x0F);
            cal.h5 = (i16::from(h[5] as i8) << 4) | i16::from(h[4] >> 4);
            cal.h6 = h[6] as i8;
        }
        cal
    }

    /// Datasheet `BME280_compensate_T_int32`: returns (temperature in 0.01 °C, t_fine).
    /// `adc_t` is the 20-bit raw value.
    pub fn compensate_temperature(&self, adc_t: i32) -> (i64, i64) {
        let adc_t = i64::from(adc_t.clamp(0, ADC20_MAX));
        let (t1, t2, t3) = (i64::from(self.t1), i64::from(self.t2), i64::from(self.t3));
        let var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11;
        let var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14;
        let t_fine = var1 + var2;
        ((t_fine * 5 + 128) >> 8, t_fine)
    }

    /// Datasheet `BME280_compensate_P_int64`: pressure in Pa as Q24.8 (divide by 256).
    /// `None` when the calibration would divide by zero.
    pub fn compensate_pressure(&self, adc_p: i32, t_fine: i64) -> Option<i128> {
        let p = |v: i16| i128::from(v);
        let adc_p = adc_p.clamp(0, ADC20_MAX);
        let mut var1 = i128::from(t_fine.clamp(-T_FINE_LIMIT, T_FINE_LIMIT)) - 128_000;
        let mut var2 = var1 * var1 * p(self.p6);
        var2 += (var1 * p(self.p5)) << 17;
        var2 += p(self.p4) << 35;
        var1 = ((var1 * var1 * p(self.p3)) >> 8) + ((var1 * p(self.p2)) << 12);
        var1 = (((1i128 << 47) + var1) * i128::from(self.p1)) >> 33;
        if var1 == 0 {
            return None;
        }
        let mut pressure = 1_048_576 - i128::from(adc_p);
        pressure = (((pressure << 31) - var2) * 3125) / var1;
        // Only this product can exceed i128 (with corrupt calibration); valid data never does.
        let q = pressure >> 13;
        let var1 = p(self.p9).checked_mul(q)?.checked_mul(q)? >> 25;
        let var2 = (p(self.p8) * pressure) >> 19;
        Some(((pressure + var1 + var2) >> 8) + (p(self.p7) << 4))
    }

    /// Datasheet `bme280_compensate_H_int32`: relative humidity in % as Q22.10 (divide by 1024).
    pub fn compensate_humidity(&self, adc_h: i32, t_fine: i64) -> i64 {
        // i128: with arbitrary 16-bit calibration the squared term exceeds i64.
        let adc_h = i128::from(adc_h.clamp(0, 0xFFFF));
        let t_fine = i128::from(t_fine.clamp(-T_FINE_LIMIT, T_FINE_LIMIT));
        let (h1, h2, h3) = (
            i128::from(self.h1),
            i128::from(self.h2),
            i128::from(self.h3),
        );
        let (h4, h5, h6) = (
            i128::from(self.h4),
            i128::from(self.h5),
            i128::from(self.h6),
        );
        let x = t_fine - 76_800;
        let offset = (((adc_h << 14) - (h4 << 20) - (h5 * x)) + 16_384) >> 15;
        let scale = (((((((x * h6) >> 10) * (((x * h3) >> 11) + 32_768)) >> 10) + 2_097_152) * h2)
            + 8_192)
            >> 14;
        let mut v = offset * scale;
        v -= ((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4;
        // Clamped to 0..=100 %RH in Q22.10, so the narrowing cannot lose anything.
        (v.clamp(0, 419_430_400) >> 12) as i64
    }
}

/// One compensated measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    pub temperature_c: f64,
    pub pressure_hpa: f64,
    /// `None` for a BMP280.
    pub humidity_pct: Option<f64>,
}

impl Measurement {
    pub fn metrics(&self) -> Vec<Metric> {
        let mut metrics = vec![
            Metric::new("temperature", self.temperature_c, "C"),
            Metric::new("pressure", self.pressure_hpa, "hPa"),
        ];
        if let Some(humidity) = self.humidity_pct {
            metrics.push(Metric::new("humidity", humidity, "%"));
        }
        metrics
    }
}

/// BME280/BMP280 driver.
pub struct Bme280<I2C, D> {
    i2c: I2C,
    delay: D,
    address: u8,
    name: String,
    /// Chip type and calibration, probed lazily and dropped after a bus error so that a
    /// re-plugged or power-cycled sensor is probed again.
    probed: Option<(Chip, Calibration)>,
}

impl<I2C: I2c, D: DelayNs> Bme280<I2C, D> {
    /// Creates the driver without touching the bus; the address must be 0x76 or 0x77.
    pub fn new(i2c: I2C, delay: D, address: u8, name: String) -> Result<Self, SensorError> {
        validate_address(address)?;
        Ok(Self {
            i2c,
            delay,
            address,
            name,
            probed: None,
        })
    }

    /// The chip found by the last successful probe.
    pub fn chip(&self) -> Option<Chip> {
        self.probed.map(|(chip, _)| chip)
    }

    /// Reads the chip id and the calibration registers.
    pub fn init(&mut self) -> Result<Chip, SensorError> {
        let mut id = [0u8; 1];
        self.read_registers(REG_CHIP_ID, &mut id)?;
        let chip = Chip::from_id(self.address, id[0])?;
        let mut tp = [0u8; 26];
        self.read_registers(REG_CALIB_TP, &mut tp)?;
        let calibration = if chip == Chip::Bme280 {
            let mut h = [0u8; 7];
            self.read_registers(REG_CALIB_H, &mut h)?;
            Calibration::from_registers(&tp, Some(&h))
        } else {
            Calibration::from_registers(&tp, None)
        };
        self.probed = Some((chip, calibration));
        Ok(chip)
    }

    /// Triggers one forced-mode conversion and returns the compensated values.
    pub fn measure(&mut self) -> Result<Measurement, SensorError> {
        let result = self.measure_inner();
        if matches!(result, Err(SensorError::Bus(_))) {
            self.probed = None;
        }
        result
    }

    /// Gives the bus and delay back (tests use it to verify mock expectations).
    pub fn release(self) -> (I2C, D) {
        (self.i2c, self.delay)
    }

    fn measure_inner(&mut self) -> Result<Measurement, SensorError> {
        let (chip, cal) = match self.probed {
            Some(probed) => probed,
            None => {
                self.init()?;
                self.probed.ok_or_else(|| {
                    SensorError::NotReady("calibration missing after probe".into())
                })?
            }
        };

        // config is only writable in sleep mode, and ctrl_hum only takes effect with the
        // following ctrl_meas write, hence this order.
        self.write_register(REG_CONFIG, CONFIG_FILTER_OFF)?;
        if chip == Chip::Bme280 {
            self.write_register(REG_CTRL_HUM, OSRS_X1)?;
        }
        self.write_register(REG_CTRL_MEAS, CTRL_MEAS_FORCED_X1)?;
        self.wait_for_conversion()?;

        let mut data = [0u8; 8];
        let len = if chip == Chip::Bme280 { 8 } else { 6 };
        self.read_registers(REG_DATA, &mut data[..len])?;
        let adc20 =
            |b: &[u8]| (i32::from(b[0]) << 12) | (i32::from(b[1]) << 4) | (i32::from(b[2]) >> 4);
        let adc_p = adc20(&data[0..3]);
        let adc_t = adc20(&data[3..6]);
        let adc_h = (i32::from(data[6]) << 8) | i32::from(data[7]);
        if adc_t == ADC_TP_SKIPPED || adc_p == ADC_TP_SKIPPED {
            return Err(SensorError::NotReady(format!(
                "{} returned the reset value instead of a conversion result",
                self.name
            )));
        }

        let (centi_c, t_fine) = cal.compensate_temperature(adc_t);
        let pressure_q24_8 =
            cal.compensate_pressure(adc_p, t_fine)
                .ok_or_else(|| SensorError::Parse {
                    what: format!("{} calibration", self.name),
                    detail: "pressure calibration is invalid (division by zero)".into(),
                })?;
        let humidity_pct = match chip {
            Chip::Bme280 if adc_h != ADC_H_SKIPPED => {
                Some(cal.compensate_humidity(adc_h, t_fine) as f64 / 1024.0)
            }
            Chip::Bme280 => {
                return Err(SensorError::NotReady(format!(
                    "{} skipped the humidity conversion",
                    self.name
                )));
            }
            Chip::Bmp280 => None,
        };
        Ok(Measurement {
            temperature_c: centi_c as f64 / 100.0,
            pressure_hpa: pressure_q24_8 as f64 / 256.0 / 100.0,
            humidity_pct,
        })
    }

    fn wait_for_conversion(&mut self) -> Result<(), SensorError> {
        self.delay.delay_ms(FIRST_POLL_DELAY_MS);
        for _ in 0..MAX_POLLS {
            let mut status = [0u8; 1];
            self.read_registers(REG_STATUS, &mut status)?;
            if status[0] & STATUS_MEASURING == 0 {
                return Ok(());
            }
            self.delay.delay_ms(POLL_DELAY_MS);
        }
        Err(SensorError::NotReady(format!(
            "{} still measuring after {MAX_POLLS} status polls",
            self.name
        )))
    }

    fn read_registers(&mut self, register: u8, buf: &mut [u8]) -> Result<(), SensorError> {
        let address = self.address;
        self.i2c
            .write_read(address, &[register], buf)
            .map_err(|e| bus_error(address, "reading register", register, &e))
    }

    fn write_register(&mut self, register: u8, value: u8) -> Result<(), SensorError> {
        let address = self.address;
        self.i2c
            .write(address, &[register, value])
            .map_err(|e| bus_error(address, "writing register", register, &e))
    }
}

fn bus_error(
    address: u8,
    action: &str,
    register: u8,
    error: &impl embedded_hal::i2c::Error,
) -> SensorError {
    SensorError::Bus(format!(
        "I2C device {address:#04x}: {action} {register:#04x} failed: {} ({error:?})",
        error.kind()
    ))
}

impl<I2C, D> Sensor for Bme280<I2C, D>
where
    I2C: I2c + Send,
    D: DelayNs + Send,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn read(&mut self) -> Result<Vec<Metric>, SensorError> {
        Ok(self.measure()?.metrics())
    }
}

/// Opens `/dev/i2c-<bus>` through rppal and probes the chip, so that a missing bus or
/// sensor is reported when the agent starts.
pub fn open_rppal(
    settings: &Bme280Settings,
    name: String,
) -> Result<Bme280<rppal::i2c::I2c, rppal::hal::Delay>, SensorError> {
    validate_address(settings.address)?;
    let bus = settings.bus;
    let i2c = rppal::i2c::I2c::with_bus(bus).map_err(|e| {
        SensorError::Unsupported(format!(
            "I2C bus {bus} (/dev/i2c-{bus}) cannot be opened: {e} (on a Raspberry Pi, enable I2C with raspi-config)"
        ))
    })?;
    let mut sensor = Bme280::new(i2c, rppal::hal::Delay::new(), settings.address, name)?;
    sensor.init()?;
    Ok(sensor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};

    const ADDR: u8 = 0x76;

    /// The worked example of the Bosch BMP280 datasheet (section 3.12), widely reused as
    /// a test vector: T = 25.08 °C, p = 100653.27 Pa.
    fn datasheet_calibration() -> Calibration {
        Calibration {
            t1: 27504,
            t2: 26435,
            t3: -1000,
            p1: 36477,
            p2: -10685,
            p3: 3024,
            p4: 2855,
            p5: 140,
            p6: -7,
            p7: 15500,
            p8: -14600,
            p9: 6000,
            // Humidity trimming as read from a real BME280 breakout.
            h1: 75,
            h2: 362,
            h3: 0,
            h4: 313,
            h5: 50,
            h6: 30,
        }
    }
    const ADC_T: i32 = 519_888;
    const ADC_P: i32 = 415_148;
    const ADC_H: i32 = 27_000;

    /// Encodes a calibration the way the chip stores it.
    fn calibration_registers(c: &Calibration) -> (Vec<u8>, Vec<u8>) {
        let mut tp = Vec::new();
        tp.extend(c.t1.to_le_bytes());
        for v in [c.t2, c.t3] {
            tp.extend(v.to_le_bytes());
        }
        tp.extend(c.p1.to_le_bytes());
        for v in [c.p2, c.p3, c.p4, c.p5, c.p6, c.p7, c.p8, c.p9] {
            tp.extend(v.to_le_bytes());
        }
        tp.push(0); // 0xA0 unused
        tp.push(c.h1);
        let h4 = c.h4 as u16;
        let h5 = c.h5 as u16;
        let mut h = Vec::new();
        h.extend(c.h2.to_le_bytes());
        h.push(c.h3);
        h.push((h4 >> 4) as u8);
        h.push(((h5 & 0x0F) << 4) as u8 | (h4 & 0x0F) as u8);
        h.push((h5 >> 4) as u8);
        h.push(c.h6 as u8);
        (tp, h)
    }

    fn data_registers(adc_p: i32, adc_t: i32, adc_h: Option<i32>) -> Vec<u8> {
        let split = |v: i32| [(v >> 12) as u8, (v >> 4) as u8, ((v & 0x0F) << 4) as u8];
        let mut data = Vec::new();
        data.extend(split(adc_p));
        data.extend(split(adc_t));
        if let Some(h) = adc_h {
            data.extend([(h >> 8) as u8, h as u8]);
        }
        data
    }

    fn probe_transactions(chip_id: u8) -> Vec<T> {
        let (tp, h) = calibration_registers(&datasheet_calibration());
        let mut t = vec![
            T::write_read(ADDR, vec![REG_CHIP_ID], vec![chip_id]),
            T::write_read(ADDR, vec![REG_CALIB_TP], tp),
        ];
        if chip_id == CHIP_ID_BME280 {
            t.push(T::write_read(ADDR, vec![REG_CALIB_H], h));
        }
        t
    }

    fn measurement_transactions(bme: bool, busy_polls: usize) -> Vec<T> {
        let mut t = vec![T::write(ADDR, vec![REG_CONFIG, 0x00])];
        if bme {
            t.push(T::write(ADDR, vec![REG_CTRL_HUM, 0x01]));
        }
        t.push(T::write(ADDR, vec![REG_CTRL_MEAS, 0x25]));
        for _ in 0..busy_polls {
            t.push(T::write_read(ADDR, vec![REG_STATUS], vec![0x08]));
        }
        t.push(T::write_read(ADDR, vec![REG_STATUS], vec![0x00]));
        t.push(T::write_read(
            ADDR,
            vec![REG_DATA],
            data_registers(ADC_P, ADC_T, bme.then_some(ADC_H)),
        ));
        t
    }

    fn driver(transactions: &[T]) -> (Bme280<Mock, NoopDelay>, Mock) {
        let mock = Mock::new(transactions);
        let sensor =
            Bme280::new(mock.clone(), NoopDelay::new(), ADDR, "bme280@0x76".into()).unwrap();
        (sensor, mock)
    }

    /// Datasheet floating-point humidity formula, as an independent cross-check.
    fn humidity_float(c: &Calibration, adc_h: f64, t_fine: f64) -> f64 {
        let var_h = t_fine - 76800.0;
        let var_h = (adc_h - (f64::from(c.h4) * 64.0 + f64::from(c.h5) / 16384.0 * var_h))
            * (f64::from(c.h2) / 65536.0
                * (1.0
                    + f64::from(c.h6) / 67108864.0
                        * var_h
                        * (1.0 + f64::from(c.h3) / 67108864.0 * var_h)));
        (var_h * (1.0 - f64::from(c.h1) * var_h / 524288.0)).clamp(0.0, 100.0)
    }

    #[test]
    fn the_datasheet_example_compensates_to_25_08_degrees() {
        let (centi, t_fine) = datasheet_calibration().compensate_temperature(ADC_T);
        assert_eq!(centi, 2508);
        assert_eq!(t_fine, 128_422);
    }

    #[test]
    fn the_datasheet_example_compensates_to_100653_pascal() {
        let cal = datasheet_calibration();
        let (_, t_fine) = cal.compensate_temperature(ADC_T);
        let pa = cal.compensate_pressure(ADC_P, t_fine).unwrap() as f64 / 256.0;
        assert!((pa - 100_653.27).abs() < 0.5, "{pa}");
    }

    #[test]
    fn integer_humidity_compensation_matches_the_floating_point_formula() {
        let cal = datasheet_calibration();
        let (_, t_fine) = cal.compensate_temperature(ADC_T);
        for adc_h in [20_000, ADC_H, 32_000, 40_000] {
            let int = cal.compensate_humidity(adc_h, t_fine) as f64 / 1024.0;
            let float = humidity_float(&cal, f64::from(adc_h), t_fine as f64);
            assert!(
                (int - float).abs() < 0.05,
                "adc_h {adc_h}: {int} vs {float}"
            );
            assert!((0.0..=100.0).contains(&int));
        }
    }

    #[test]
    fn calibration_registers_decode_including_the_shared_h4_h5_nibbles() {
        let mut cal = datasheet_calibration();
        cal.h5 = -7; // negative 12-bit value exercises the sign extension
        let (tp, h) = calibration_registers(&cal);
        let decoded =
            Calibration::from_registers(&tp.try_into().unwrap(), Some(&h.try_into().unwrap()));
        assert_eq!(decoded, cal);
    }

    #[test]
    fn a_bme280_reports_temperature_pressure_and_humidity() {
        let mut t = probe_transactions(CHIP_ID_BME280);
        t.extend(measurement_transactions(true, 2));
        let (mut sensor, mut mock) = driver(&t);
        let metrics = sensor.read().unwrap();
        assert_eq!(sensor.chip(), Some(Chip::Bme280));
        let names: Vec<_> = metrics.iter().map(|m| (m.name.as_str(), m.unit)).collect();
        assert_eq!(
            names,
            [("temperature", "C"), ("pressure", "hPa"), ("humidity", "%")]
        );
        assert!((metrics[0].value - 25.08).abs() < 1e-9);
        assert!(
            (metrics[1].value - 1006.5327).abs() < 0.01,
            "{}",
            metrics[1].value
        );
        let cal = datasheet_calibration();
        let expected_h = humidity_float(&cal, f64::from(ADC_H), 128_422.0);
        assert!((metrics[2].value - expected_h).abs() < 0.05);
        mock.done();
    }

    #[test]
    fn calibration_is_read_once_and_reused_for_later_readings() {
        let mut t = probe_transactions(CHIP_ID_BME280);
        t.extend(measurement_transactions(true, 0));
        t.extend(measurement_transactions(true, 0));
        let (mut sensor, mut mock) = driver(&t);
        sensor.read().unwrap();
        sensor.read().unwrap();
        mock.done();
    }

    #[test]
    fn a_bmp280_reports_no_humidity() {
        let mut t = probe_transactions(0x58);
        t.extend(measurement_transactions(false, 0));
        let (mut sensor, mut mock) = driver(&t);
        let metrics = sensor.read().unwrap();
        assert_eq!(sensor.chip(), Some(Chip::Bmp280));
        assert_eq!(metrics.len(), 2);
        assert!(metrics.iter().all(|m| m.name != "humidity"));
        assert!((metrics[0].value - 25.08).abs() < 1e-9);
        mock.done();
    }

    #[test]
    fn a_wrong_chip_id_is_a_clear_error() {
        // 0x61 is a BME680, which has a different register map.
        let (mut sensor, mut mock) = driver(&[T::write_read(ADDR, vec![REG_CHIP_ID], vec![0x61])]);
        let err = sensor.read().unwrap_err();
        assert!(matches!(
            err,
            SensorError::WrongChipId {
                address: 0x76,
                found: 0x61
            }
        ));
        assert!(err.to_string().contains("0x61"), "{err}");
        mock.done();
    }

    #[test]
    fn a_bus_error_is_a_sensor_error_and_the_chip_is_probed_again_next_time() {
        let mut t = probe_transactions(CHIP_ID_BME280);
        t.push(
            T::write(ADDR, vec![REG_CONFIG, 0x00]).with_error(ErrorKind::NoAcknowledge(
                embedded_hal::i2c::NoAcknowledgeSource::Address,
            )),
        );
        t.extend(probe_transactions(CHIP_ID_BME280));
        t.extend(measurement_transactions(true, 0));
        let (mut sensor, mut mock) = driver(&t);
        let err = sensor.read().unwrap_err();
        assert!(matches!(err, SensorError::Bus(_)), "{err}");
        assert!(err.to_string().contains("0x76"), "{err}");
        assert!(sensor.read().is_ok());
        mock.done();
    }

    #[test]
    fn a_conversion_that_never_finishes_is_an_error_after_bounded_polling() {
        let mut t = probe_transactions(CHIP_ID_BME280);
        t.push(T::write(ADDR, vec![REG_CONFIG, 0x00]));
        t.push(T::write(ADDR, vec![REG_CTRL_HUM, 0x01]));
        t.push(T::write(ADDR, vec![REG_CTRL_MEAS, 0x25]));
        for _ in 0..MAX_POLLS {
            t.push(T::write_read(ADDR, vec![REG_STATUS], vec![0x08]));
        }
        let (mut sensor, mut mock) = driver(&t);
        let err = sensor.read().unwrap_err();
        assert!(matches!(err, SensorError::NotReady(_)), "{err}");
        mock.done();
    }

    #[test]
    fn reset_values_in_the_data_registers_are_not_reported_as_a_measurement() {
        let mut t = probe_transactions(CHIP_ID_BME280);
        t.push(T::write(ADDR, vec![REG_CONFIG, 0x00]));
        t.push(T::write(ADDR, vec![REG_CTRL_HUM, 0x01]));
        t.push(T::write(ADDR, vec![REG_CTRL_MEAS, 0x25]));
        t.push(T::write_read(ADDR, vec![REG_STATUS], vec![0x00]));
        t.push(T::write_read(
            ADDR,
            vec![REG_DATA],
            data_registers(ADC_TP_SKIPPED, ADC_TP_SKIPPED, Some(ADC_H_SKIPPED)),
        ));
        let (mut sensor, mut mock) = driver(&t);
        assert!(matches!(sensor.read(), Err(SensorError::NotReady(_))));
        mock.done();
    }

    #[test]
    fn only_addresses_0x76_and_0x77_are_accepted() {
        for address in [0x76, 0x77] {
            let mock = Mock::new(&[]);
            assert!(Bme280::new(mock.clone(), NoopDelay::new(), address, "b".into()).is_ok());
            mock.clone().done();
        }
        let mut mock = Mock::new(&[]);
        let err = Bme280::new(mock.clone(), NoopDelay::new(), 0x48, "b".into())
            .err()
            .unwrap();
        assert!(matches!(err, SensorError::InvalidConfig(_)));
        mock.done();
    }

    #[test]
    fn garbage_calibration_does_not_panic() {
        let cal = Calibration {
            t1: u16::MAX,
            t2: i16::MIN,
            t3: i16::MIN,
            p1: u16::MAX,
            p2: i16::MIN,
            p3: i16::MAX,
            p4: i16::MIN,
            p5: i16::MAX,
            p6: i16::MIN,
            p7: i16::MAX,
            p8: i16::MIN,
            p9: i16::MAX,
            h1: u8::MAX,
            h2: i16::MIN,
            h3: u8::MAX,
            h4: i16::MIN,
            h5: i16::MAX,
            h6: i8::MIN,
        };
        for adc in [0, 0x7FFFF, 0xFFFFF] {
            let (_, t_fine) = cal.compensate_temperature(adc);
            let _ = cal.compensate_pressure(adc, t_fine);
            let _ = cal.compensate_humidity(adc & 0xFFFF, t_fine);
        }
        assert_eq!(Calibration::default().compensate_pressure(ADC_P, 0), None);
    }
}
